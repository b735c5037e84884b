"""kubedistill trainer: distill a teacher LLM into a student on Ray workers."""
