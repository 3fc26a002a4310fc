"""One library function per job (simulate, correct, sweep, suite, check): config in, result out."""
