"""The research: Experiment 1 (`analyze`: CV at equal text_tokens vs the noise floor) and Experiment 2
(`compare`: feature variants and reference models on held-out splits, the verdict). Results are typed
(`study.results`); their JSON files are the serialisation that the report reads back."""
