"""Model layer: tiny base, processor, CMoE layers, routers, probes, task locator, state format."""
