"""The speed benchmark's parts; ``benchmarks/speed.py`` is its command line (see ``benchmarks/README.md``).

Each module holds one concept, lower ones first (a module imports only those above it in this list):

* :mod:`speedbench.workloads`: the ``--workload`` models (offline SmolLM2, the tiny model, LLaMA
  shapes with random weights) and a run's device, dtype, rounding and skipped layers;
* :mod:`speedbench.methods`: the presets and ablation variants timed, at a ratio;
* :mod:`speedbench.stats`: ratios, shares of an ideal, differences paired per interleaved round;
* :mod:`speedbench.costs`: counted ideals: reused probe FLOPs, weight and KV bytes per decode step;
* :mod:`speedbench.run_info`: the settings every report records, progress messages;
* :mod:`speedbench.formatting`: the markdown pieces both reports share;
* :mod:`speedbench.output`: writing a report's JSON and markdown (also used by ``ab_speed.py`` and
  ``block_reuse.py``);
* :mod:`speedbench.forward` / :mod:`speedbench.forward_report`: the whole-forward benchmark and its
  tables;
* :mod:`speedbench.generation` / :mod:`speedbench.generation_report`: ``--generation`` (prefill and
  decode of ``model.generate``) and its tables;
* :mod:`speedbench.cli`: the options and ``main``.

The package needs ``benchmarks/`` on ``sys.path`` (``speed.py`` and the scripts beside it put it
there).
"""
