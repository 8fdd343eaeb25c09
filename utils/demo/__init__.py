"""What only the quickstart and the real-model demo use: synthetic problems, pretraining, tiny and real models, the report."""
