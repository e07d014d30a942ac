"""API-format prompts for the integration tests (a family whose network takes no 8 x 8 latent, PixArt, gets the
smallest one it takes, tiny_models.PIXELS)."""
from test_nodes.tiny_models import PIXELS


def custom_advanced(sampler_type, sampler_inputs, arch="sd15", steps=6, cfg=4.0, size=64, batch=1,
                    scheduler="normal", seed=0, flip_sigmas=False):
    """Tiny checkpoint -> text encode -> SamplerCustomAdvanced with a pack SAMPLER -> decode, stats."""
    size = max(size, PIXELS.get(arch, 0))
    p = {
        "ckpt": {"class_type": "TrainFreeTestTinyCheckpoint", "inputs": {"arch": arch, "seed": 0}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a lighthouse"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
        "sampler": {"class_type": sampler_type, "inputs": dict(sampler_inputs)},
        "sched": {"class_type": "BasicScheduler", "inputs": {"model": ["ckpt", 0], "scheduler": scheduler,
                                                             "steps": steps, "denoise": 1.0}},
        "guider": {"class_type": "CFGGuider", "inputs": {"model": ["ckpt", 0], "positive": ["pos", 0],
                                                         "negative": ["neg", 0], "cfg": cfg}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "sample": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0],
            "sigmas": ["sched", 0], "latent_image": ["latent", 0]}},
        "stats": {"class_type": "TrainFreeTestLatentStats", "inputs": {"samples": ["sample", 0]}},
    }
    if flip_sigmas:
        p["flip"] = {"class_type": "FlipSigmas", "inputs": {"sigmas": ["sched", 0]}}
        p["sample"]["inputs"]["sigmas"] = ["flip", 0]
    return p


def ksampler(sampler_name, arch="sd15", steps=6, cfg=4.0, size=64, scheduler="normal", seed=0, batch=1):
    """The plain KSampler graph with a sampler picked from its dropdown."""
    size = max(size, PIXELS.get(arch, 0))
    return {
        "ckpt": {"class_type": "TrainFreeTestTinyCheckpoint", "inputs": {"arch": arch, "seed": 0}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a lighthouse"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler_name, "scheduler": scheduler,
            "denoise": 1.0}},
        "stats": {"class_type": "TrainFreeTestLatentStats", "inputs": {"samples": ["ks", 0]}},
    }


def patched_ksampler(chain, sampler_name="euler", prefix="patch", **kw):
    """``ksampler`` whose model goes through ``chain``, [(MODEL-patch node type, its other inputs)], in order;
    the patch nodes get ids prefix0, prefix1, ..."""
    p = ksampler(sampler_name, **kw)
    src = ["ckpt", 0]
    for i, (node, inputs) in enumerate(chain):
        p[f"{prefix}{i}"] = {"class_type": node, "inputs": dict(inputs, model=src)}
        src = [f"{prefix}{i}", 0]
    p["ks"]["inputs"]["model"] = src
    return p


SAMPLER_NODES = {
    "TrainFreeGHVBSampler": {"order": 3.5},
    "TrainFreePLMSHeavyBallSampler": {"order": 4, "beta": 0.9},
    "TrainFreeDPMPP2MHeavyBallSampler": {"beta": 0.8},
    "TrainFreeTimeShiftDDIMSampler": {"window": 80, "cutoff": 300, "data_variance": 0.0},
    "TrainFreeTimeShiftDPMPP2MSampler": {"window": 30, "cutoff": 300, "data_variance": 0.0},
}
