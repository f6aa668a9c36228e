"""mmjax.kernels."""
