"""Looking at a compiled model: the rich summary table, the HTML graph view, activation plots.

``activations`` records the statistics at compile time; ``summary`` draws ``compiled.summary()``;
``html`` writes ``ditq inspect --html``; ``plot`` writes ``compiled.plot(...)``'s PNGs;
``error_budget`` measures which class of activation quantizers the output error comes from.
"""
