"""`m2f train` (`job.run(config)`) and `m2f synth`, the synthetic data it can train on."""
