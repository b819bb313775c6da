"""Judge trained models: compare runs, ensemble them (fit on validation only), and measure sharpness."""
