"""One library function per CLI command, chaining the stages: `scan`, `prune`, `clamp`, `sweep`,
`evaluate`, `synthesize`.

Shared pieces one floor down, which commands import and never each other: `options` (scan and
preprocessing options), `evidence` (trigger evidence: given, suspect images or synthesized),
`ratio` (the pruning-ratio sweep that `prune --max-acc-drop` and `sweep` both run) and `common`
(calibration sources, verification inputs, report sections).
"""
