"""From statistics to decisions, in pure numpy: which channels to flag (`flag`), what bounds a
clamp uses (`bounds`), and whether a trigger can be synthesized for a class (`synthesis`)."""
