"""mmjax.data."""
