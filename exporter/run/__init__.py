"""Running a recipe: the run context, the stage cache and its registry, the inputs, the stages, the
search, the one final evaluation, the export, and every method (PrivacyScalpel and the unlearning
baselines) run the same way."""
