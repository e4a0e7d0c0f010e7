"""Lightning callbacks of ppg, installed as ``ppg.callbacks``: per-class metrics, gradient noise, transcripts, throughput, run records."""
