"""Research code, apart from the shipped path: the reproduction study, method comparisons at equal cost, the
alternative selection metrics, and the HTML report. Nothing under ``klas/stages`` imports from here."""
