"""`GlobalStepTensorBoard`: TensorBoard logs whose steps run on across `fit` calls and
resumes (the GPT, translation and Llama training loops use it)."""

import keras


class GlobalStepTensorBoard(keras.callbacks.TensorBoard):
    """`keras.callbacks.TensorBoard` whose steps run on across `fit` calls and resumes.

    Keras restarts its batch count at each `fit` and writes a `fit`'s epoch summaries at
    epoch 0, so the capacity stages (one `fit` each) and a resumed run would overwrite
    each other's points. Here batch summaries are at the global optimizer step, and
    epoch summaries (one per stage, always written) at the step its stage ended.

    Args:
        log_dir: str, where the event files go (`train/` under it).
        initial_step: int, the step training starts (or resumes) at.
        **kwargs: `keras.callbacks.TensorBoard`'s (`update_freq`, ...).
    """

    def __init__(self, log_dir: str, initial_step: int = 0, **kwargs):
        super().__init__(log_dir=log_dir, **kwargs)
        self.step = initial_step

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        # Keras's batch count, which its `on_train_begin` has just reset to 0.
        self._global_train_batch = self.step

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        self.step += 1

    def on_epoch_end(self, epoch, logs=None):
        # Keras leaves the last batch's every-`update_freq` condition in force here, which
        # drops the epoch summaries of a stage not ending on a multiple of `update_freq`.
        with self.summary.record_if(True):
            super().on_epoch_end(self.step, logs)
