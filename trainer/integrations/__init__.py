"""Training students from caches inside other libraries' trainers (Hugging Face `transformers.Trainer`)."""
