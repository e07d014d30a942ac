"""Example workflow for DeepCache: checkpoint -> DeepCache -> plain KSampler (U-Net models only)."""

SOCKETS = {"TrainFreeDeepCache": ([("model", "MODEL")], [("MODEL", "MODEL")])}

NOTE = ("DeepCache (TrainFree): the whole U-Net runs on ~1 step in 5 (paper's non-uniform schedule); in between "
        "only the shallow branch runs and reuses the cached deep feature. The console and this node show, after each "
        "run, how many U-Net calls were shortened and the measured speed-up. U-Net models only (SD1.x, SD2.x, SDXL); "
        "cache_interval 3 is gentler, cache_depth 0 faster.")


def _graph(builder):
    return builder.build_patch("TrainFreeDeepCache", [5, 1, "quadratic", 0.0, 1.0], 50, 7.5, "dpmpp_2m", NOTE,
                               "trainfree_deep_cache")


GRAPHS = {"deep_cache": _graph}
ARCHS = {"deep_cache": ["sd15", "sdxl", "svd"]}
