"""Running a trained DPN: the `Predictor` and dataset evaluation."""
