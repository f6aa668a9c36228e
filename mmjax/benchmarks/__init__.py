"""mmjax.benchmarks."""
