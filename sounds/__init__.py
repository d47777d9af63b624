"""The voice prompts (sounds/prompts.txt, made by make sounds), shipped as agi.sounds."""
