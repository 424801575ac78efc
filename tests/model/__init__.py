"""Tests of the CMoE model layer (cmoe/model): tiny random LLaVA models, seconds each."""
