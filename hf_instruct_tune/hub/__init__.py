"""Publishing adapters to the Hugging Face Hub: model cards, repo creation and uploads."""
