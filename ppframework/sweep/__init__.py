"""Running the points of a sweep (``ppf ablate``): the point store that makes sweeps resumable, and
the Ray launcher that spreads points over a cluster (:mod:`ppframework.sweep.ray_launcher`)."""
