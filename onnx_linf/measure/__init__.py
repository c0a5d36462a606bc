"""Images in, statistics out.

`preprocess` (pixels -> model input, pixel-space triggers) and `sources` (image folders, arrays,
feeds, data-loader scripts) give batches; `instrument` adds in-graph per-channel reductions as graph
outputs; `session` owns ONNX Runtime sessions and providers; `calibrate` streams batches through a
session; `stats` keeps exact, mergeable aggregates; `probe` ties them together for a set of maps.
`accuracy` (clean accuracy, attack success rate) and `exceedance` (how far images leave clean
bounds) are measurements on the same machinery. This is the seam a distributed engine plugs into:
everything downstream only sees `stats.ChannelStats`.
"""
