"""mmjax.objectives."""
