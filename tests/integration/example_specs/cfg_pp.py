"""Example workflows for CFG++: the SAMPLER node in SamplerCustomAdvanced, and a KSampler dropdown entry."""

SOCKETS = {"TrainFreeCFGppSampler": ([("ems", "TRAINFREE_EMS")], [("SAMPLER", "SAMPLER")])}

NODE_NOTE = ("CFG++: the guider's CFG is the CFG++ scale lambda (0.4-1.0, here 0.6; about CFG 1 + 11.5 lambda). "
             "Guidance acts on the denoised estimate and the sample is renoised with the negative prompt's noise, "
             "which keeps it on the data manifold at few steps. Needs a negative prompt (an empty one is fine). "
             "Exact for SD1.5/SDXL (eps, v) and flow models (SD3, Flux, Wan). Every solver is also in KSampler's "
             "list as trainfree_<solver>_cfg_pp (except dpm_solver_v3, which needs its statistics).")
KSAMPLER_NOTE = ("CFG++ from plain KSampler: pick a trainfree_*_cfg_pp sampler and set cfg to lambda (0.4-1.0). "
                 "cfg 1 still evaluates the negative prompt (lambda = 1), as ComfyUI's own *_cfg_pp samplers do.")


def _ksampler(b):
    specs = [
        (1, "CheckpointLoaderSimple", ["v1-5-pruned-emaonly-fp16.safetensors"], (20, 200)),
        (2, "CLIPTextEncode", ["a watercolor painting of a lighthouse on a cliff at sunset, detailed"], (400, 60)),
        (3, "CLIPTextEncode", ["blurry, low quality, watermark"], (400, 300)),
        (4, "EmptyLatentImage", [512, 512, 1], (400, 540)),
        (9, "KSampler", [0, "fixed", 12, 0.6, "trainfree_dpmpp_2m_cfg_pp", "karras", 1.0], (800, 200)),
        (10, "VAEDecode", [], (1180, 200)),
        (11, "SaveImage", ["trainfree_cfg_pp_ksampler"], (1420, 200)),
        (12, "Note", [KSAMPLER_NOTE], (20, 520)),
    ]
    wires = [(1, 1, 2, "clip"), (1, 1, 3, "clip"), (1, 0, 9, "model"), (2, 0, 9, "positive"), (3, 0, 9, "negative"),
             (4, 0, 9, "latent_image"), (9, 0, 10, "samples"), (1, 2, 10, "vae"), (10, 0, 11, "images")]
    return b._assemble(specs, wires)


GRAPHS = {
    "cfg_pp_sampler": lambda b: b.build("TrainFreeCFGppSampler", ["dpmpp_2m"], 12, 0.6, NODE_NOTE,
                                        "trainfree_cfg_pp_sampler"),
    "cfg_pp_ksampler": _ksampler,
}
