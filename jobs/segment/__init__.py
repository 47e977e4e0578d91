"""`m2f segment`: `job.run(config)` runs it, in phases (setup, plan, process, ending)."""
