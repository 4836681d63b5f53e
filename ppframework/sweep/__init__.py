"""Running the points of a sweep across machines: the Ray launcher that spreads ``ppf ablate``'s
points over a cluster (:mod:`ppframework.sweep.ray_launcher`). The point store that makes sweeps
resumable lives below it, in :mod:`ppframework.runner.points`."""
