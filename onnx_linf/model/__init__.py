"""What the graph is: loading and validating a model (`load`), finding its activation maps (`taps`),
and writing models and reports to disk safely (`files`)."""
