"""The MoE layer and how a dense model gets it.

One MoE forward is four steps, each its own module: ``router`` (one GEMM, DeepSpeed's gate rules -> one ``Routes``
record), ``dispatcher`` (routes sorted by expert; the all-to-all at ep_size > 1), ``experts`` (the local experts as
one grouped GEMM, or one by one), and the combine in ``layer``; ``shared`` holds the always-on experts the layer
adds beside them. ``surgery`` puts layers into a model by its ``MoELayout`` (run/moe_layout.py), after ``checks`` and
``parallel`` (which also makes the expert-parallel groups); ``counters`` add up the ``Routes`` of training forwards;
``padding`` leaves a batch's padding out of routing;
``step`` is what every trainer calls: the router losses, the bias updates after an optimizer step, the metrics.

Shape letters, one legend for the whole package (a tensor's name ends with its shape): B batch, S sequence,
T tokens (B x S), D hidden size, F FFN width, E experts (global), L local experts (E / ep_size), K top-k,
R routes (T x K), N rows a rank's experts process.
"""
