"""Lightning callbacks: sample grids and anything else the Trainer calls."""
