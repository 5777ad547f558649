"""What users run on top of the library: evaluation, visualisation, option comparison, fine-tuning and the
throughput benchmark. Not imported by ``import evit``; plots and training live here only."""
