"""Online and iterative preference optimisation: sample, label with a preference model, update, repeat.

:mod:`diffdpo.online.selection` turns one prompt's labelled outputs into pairs (best vs worst with
SPPO's win probabilities, one labelled pair, or RSO's rejection sampling); :mod:`diffdpo.online.loop`
runs the rounds on any policy that can sample and take preference steps (the LLM one is
:class:`diffdpo.llm.online.LLMOnlinePolicy`).
"""
