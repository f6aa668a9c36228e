"""mmjax.tools."""
