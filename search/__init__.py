"""Search: strategy, Ray Tune workers, Optuna storage, budgets, selection and exports."""
