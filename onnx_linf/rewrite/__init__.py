"""Graph surgery and its verification.

`graph` holds what every rewrite shares (graph facts read before any edit, fresh names, the
graphsurgeon import/export that keeps what graphsurgeon drops); `zero` makes channels exactly 0
(folded into weights where provably exact, else a mask); `clamp` bounds activations; `reference`
builds the independent masked model that `verify` compares a surgery against.
"""
