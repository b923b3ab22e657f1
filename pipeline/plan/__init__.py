"""What a run costs before it starts (`python -m pipeline.plan`): the layer above the loops."""
