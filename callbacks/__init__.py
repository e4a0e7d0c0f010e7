"""Lightning callbacks for ppg runs."""
