"""The DiT families that not every family-specific node supports (AuraFlow, HiDream-I1, Cosmos-Predict2, OmniGen2,
PixArt-alpha / Sigma):
DeepCache's refusal reaches the user as the node's own message through ComfyUI's executor, naming the network and
what to use instead, and the next prompt runs. (The family-independent nodes run their examples on these families in
test_example_workflows; PAG on all four is tested in test_pag_other_dits, the DiT cache on all four in
test_cache_quant_nodes and test_block_patches, NASA on all four with the other DiTs.)"""
import pytest
from prompts import ksampler, patched_ksampler

NETWORKS = {"auraflow": "MMDiT", "hidream": "HiDreamImageTransformer2DModel", "cosmos_predict2": "MiniTrainDIT",
            "omnigen2": "OmniGen2Transformer2DModel", "pixart": "PixArtMS"}
NODES = {
    "TrainFreeDeepCache": ({"cache_interval": 3, "cache_depth": 1, "schedule": "uniform", "start_percent": 0.0,
                            "end_percent": 1.0},
                           r"DeepCache needs a U-Net with long skip connections .*with a {net}, which has none\. For "
                           r"DiT/flow models use the DiT Block Cache"),
}
REFUSED = [("TrainFreeDeepCache", arch) for arch in NETWORKS]


@pytest.mark.parametrize("node,arch", REFUSED, ids=[f"{n}-{a}" for n, a in REFUSED])
def test_a_refusal_is_the_nodes_message_and_the_next_prompt_runs(comfyui, node, arch):
    import re

    inputs, pattern = NODES[node]
    ok, _, err = comfyui.run(patched_ksampler([(node, inputs)], arch=arch, steps=2, cfg=3.0))
    assert not ok
    (kind, data), = err
    assert kind == "execution_error" and data["node_type"] == node and data["exception_type"].endswith("ValueError")
    assert re.search(pattern.format(net=NETWORKS[arch]), data["exception_message"]), data["exception_message"]
    ok, out, err = comfyui.run(ksampler("euler", arch=arch, steps=2, cfg=3.0))
    assert ok, err
    assert "finite=True" in out["stats"]["text"][0]
