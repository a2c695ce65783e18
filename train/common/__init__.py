"""What both trainers share: settings, session, sampler, optimiser step, checkpoints, guards, exit codes."""
