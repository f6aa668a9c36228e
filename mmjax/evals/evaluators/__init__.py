"""The evaluator types of config.evals (mmjax.evals.TYPES): one module each."""
