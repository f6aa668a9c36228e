"""mmjax.parallel."""
