"""The pack as ComfyUI loads it: node ids, schemas, tooltips, dropdown entries."""
import pytest

PACK_NODES = {
    "TrainFreeGHVBSampler", "TrainFreePLMSHeavyBallSampler", "TrainFreeDPMPP2MHeavyBallSampler",
    "TrainFreeTimeShiftDDIMSampler", "TrainFreeTimeShiftDPMPP2MSampler",
    "TrainFreeDPMSolverV3Calibrate", "TrainFreeDPMSolverV3Load", "TrainFreeDPMSolverV3Sampler",
    "TrainFreeDCSolverSearch", "TrainFreeDCSolverLoad", "TrainFreeDCSolverSampler", "TrainFreeScheduleSearch",
    "TrainFreeAdaptiveGuidance", "TrainFreeAdaptiveGuidanceGuider",
    "TrainFreeLinearAGCalibrate", "TrainFreeLinearAGLoad", "TrainFreeLinearAG", "TrainFreeHybridGuider",
    "TrainFreeCFGppSampler", "TrainFreePAG", "TrainFreeNASA",
    "TrainFreeDeepCache", "TrainFreeCacheQuantCalibrate", "TrainFreeCacheQuantLoad", "TrainFreeDiTCache",
}
_BASE_DROPDOWN = {"trainfree_ghvb", "trainfree_plms_hb", "trainfree_dpmpp_2m_hb", "trainfree_ts_ddim",
                  "trainfree_ts_dpmpp_2m"}
DROPDOWN = _BASE_DROPDOWN | {f"{n}_cfg_pp" for n in _BASE_DROPDOWN} | {
    "trainfree_dpmpp_2m_cfg_pp", "trainfree_plms_cfg_pp", "trainfree_uni_pc_bh2_cfg_pp"}


def test_every_node_is_registered_with_a_display_name(comfyui):
    mappings = comfyui.nodes.NODE_CLASS_MAPPINGS
    assert PACK_NODES <= set(mappings)
    pack = comfyui.pack()
    assert set(pack.NODE_CLASS_MAPPINGS) == PACK_NODES
    for node_id in PACK_NODES:
        assert node_id.startswith("TrainFree")
        assert comfyui.nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id].endswith("(TrainFree)")


@pytest.mark.parametrize("node_id", sorted(PACK_NODES))
def test_schema_tooltips_and_category(comfyui, node_id):
    cls = comfyui.nodes.NODE_CLASS_MAPPINGS[node_id]
    spec = cls.INPUT_TYPES()
    assert cls.CATEGORY.startswith("trainfree/") and cls.DESCRIPTION
    assert cls.RETURN_TYPES in (("SAMPLER",), ("SIGMAS",), ("MODEL",), ("GUIDER",), ("TRAINFREE_EMS",),
                                ("TRAINFREE_DC_RATIOS",), ("TRAINFREE_LINEAR_AG",), ("TRAINFREE_CACHE_SCHEDULE",))
    assert len(cls.OUTPUT_TOOLTIPS) == 1
    for name, (kind, *rest) in {**spec.get("required", {}), **spec.get("optional", {})}.items():
        opts = rest[0] if rest else {}
        assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
        if kind in ("INT", "FLOAT"):
            assert opts["min"] <= opts["default"] <= opts["max"]
    assert hasattr(cls(), cls.FUNCTION)


def test_dropdown_entries_extend_copies_of_comfys_lists(comfyui):
    import comfy.samplers as cs
    import comfy_extras.nodes_custom_sampler as ncs

    names = comfyui.nodes.KSampler.INPUT_TYPES()["required"]["sampler_name"][0]
    assert DROPDOWN <= set(names)
    assert DROPDOWN <= set(ncs.KSamplerSelect.INPUT_TYPES()["required"]["sampler_name"][0])
    builtin = cs.KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"]
    assert names[:len(builtin)] == builtin          # ComfyUI's own entries untouched, in order
    assert not set(cs.KSAMPLER_NAMES) & DROPDOWN    # its own list objects are not rewritten
    assert cs.KSampler.SAMPLERS is cs.SAMPLER_NAMES
    for name in DROPDOWN:
        assert callable(cs.sampler_object(name).sampler_function)


def test_pyproject_is_valid_for_the_registry(comfyui):
    """ComfyUI's own copy of the registry parser (kept in sync with comfy-cli) reads our pyproject."""
    from comfy_config import config_parser

    from harness import ROOT

    cfg = config_parser.extract_node_configuration(str(ROOT))
    assert cfg is not None and "comfyui" not in cfg.project.name.lower()
    assert cfg.project.version and cfg.project.urls.repository and cfg.project.urls.issues
    assert cfg.project.license.file == "LICENSE"
    assert cfg.tool_comfy.publisher_id and cfg.tool_comfy.display_name and cfg.tool_comfy.icon
    assert cfg.project.supported_comfyui_version.startswith(">=")
