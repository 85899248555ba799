"""Every loss in one place: token cross-entropy and log-probs (`cross_entropy`), distillation
(`distill`), preference losses (`preference`) and policy-gradient objectives (`policy`)."""
