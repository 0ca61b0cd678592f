"""Models in and out: Hugging Face GPT-2 folders and hub ids, their tokenizer files, and load_model,
the one reader of every model a user can name."""
