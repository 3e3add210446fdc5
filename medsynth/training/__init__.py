"""Lightning training of medsynth models (one LightningModule per stage) and callbacks."""
