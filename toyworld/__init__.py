"""The toy world: synthetic one-object scenes, their captions, the tiny model trained on them,
and the reader that checks an image against its caption.

    captions  the words, the caption grammar, the train / held-out split of (colour, shape) pairs
    scenes    the scene generator (muted background, one flat-coloured shape)
    reader    reads colour and shape back from pixels, exactly and softly (differentiable)
    tiny      builds the tiny Stable Diffusion pipeline (`texforce make-tiny`)
    pretrain  its offline pretraining on scenes

Not RL: nothing in `rl/` but the CLI entry (`make-tiny`) imports it; the reward
`object_alignment` (`rewards.objects`) uses the reader.
Importing `toyworld` loads nothing; each module imports what it needs.
"""
