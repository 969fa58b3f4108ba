"""Emphasis modes; mirrors modules/sd_emphasis.py."""
from __future__ import annotations


class Emphasis:  # mirrors modules/sd_emphasis.py (Emphasis)
    name = "Base"
    description = ""
    tokens = None
    multipliers = None
    z = None

    def after_transformers(self):
        pass


class EmphasisNone(Emphasis):  # mirrors (EmphasisNone): brackets are literal text, BREAK is not special
    name = "None"
    description = "disable the mechanism entirely and treat (:.1.1) as literal characters"


class EmphasisIgnore(Emphasis):  # mirrors (EmphasisIgnore): brackets are parsed away, weights ignored
    name = "Ignore"
    description = "treat all empasised words as if they have no emphasis"


class EmphasisOriginal(Emphasis):  # mirrors (EmphasisOriginal): scale each token vector, then restore the mean
    name = "Original"
    description = "the original emphasis implementation"

    def after_transformers(self):
        original_mean = self.z.mean()
        self.z = self.z * self.multipliers.reshape(self.multipliers.shape + (1,)).expand(self.z.shape)
        self.z = self.z * (original_mean / self.z.mean())


class EmphasisOriginalNoNorm(EmphasisOriginal):  # mirrors (EmphasisOriginalNoNorm)
    name = "No norm"
    description = "same as original, but without normalization (seems to work better for SDXL)"

    def after_transformers(self):
        self.z = self.z * self.multipliers.reshape(self.multipliers.shape + (1,)).expand(self.z.shape)


def get_current_option(emphasis_option_name):  # mirrors modules/sd_emphasis.py (get_current_option)
    return next(iter([x for x in options if x.name == emphasis_option_name]), EmphasisOriginal)


options = [EmphasisNone, EmphasisIgnore, EmphasisOriginal, EmphasisOriginalNoNorm]  # mirrors (options)
