"""mmjax: multimodal foundation-model pretraining in JAX."""
