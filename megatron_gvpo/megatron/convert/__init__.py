"""Hugging Face checkpoints in and out of Megatron `dist_checkpointing` checkpoints, one tensor at a time.

import (`to_megatron.import_hf`): HF directory -> a Megatron checkpoint (torch_dist format) of the model weights
    that the trainer loads at any TP/PP/DP layout (`model.load`). The checkpoint's structure (sharded keys,
    global shapes, the layer axis, the gate/up split of linear_fc1) is taken from Megatron itself: a `GPTModel`
    built on the meta device (no memory) provides `sharded_state_dict()` (`common.meta_model`,
    `common.shard_table`), and the bytes of each shard are produced only when PyTorch's checkpoint writer asks
    for them (`to_megatron._Materializer`, behind the planner of `to_megatron._streaming_strategy`): the HF
    tensors of that one parameter are read straight into their places in it (the layouts of
    `megatron_gvpo.models.hf_maps.VIEWS`: no concatenation, no copy), written and overwritten by the next
    parameter. The archives are written without CRC-32s and without an fsync per file
    (`to_megatron._without_crc32`, `to_megatron._streaming_strategy`), which made up more than half of the
    time; the whole output is flushed once before it is published (`common.atomic_output_dir`). Megatron's
    sharded state dict is built once (for the shard table and the save), and its process groups are released
    as soon as it is built.
export (`to_hf.export_hf`): a Megatron checkpoint (from import or from training) -> HF safetensors shards with
    an index, config.json, generation_config.json and the tokenizer files, streamed into shard files whose
    headers were written from a plan made up front. The metadata is read once (`stored.CheckpointReader`); an
    HF tensor stored plainly (a whole chunk, or a contiguous part such as linear_fc1's gate half or a query
    group's rows of linear_qkv) is copied file to file by the kernel (`os.copy_file_range`), anything else (a
    chunk written at another TP layout, a dtype conversion) is read alone into memory (one layer's chunk of a
    stacked tensor, not the stack) and written from its views. Whether a stored chunk is plain is read from its
    archive's index and pickle (`stored._stored_tensor_data`), not by `torch.load`.

Both directions have the disk write their output while they write it (`utils.files.WritebackPacer`), so the
one flush before publishing finds little left to wait for; and they keep the garbage collector off the
objects that existed before (`common._collecting_only_new_objects`). Per-tensor costs matter for
mixture-of-experts checkpoints, thousands of 2 MB expert matrices.

Both keep at most one parameter in memory, in one buffer reused for every parameter (`common.ReusedBuffer`), so
peak memory is below 1.5x the largest tensor whatever the model size; throughput is close to that of a plain
safetensors read and write of the same bytes (both measured in benchmarks/convert_memory.py). The HF files the
model needs besides its weights (config, generation config, tokenizer) travel inside the Megatron checkpoint in
`hf/`, so an exported model is complete. Output directories are written as `<out>.tmp` and renamed when
complete: an interrupted run never leaves a directory that looks finished.

Vocabulary padding: Megatron pads the vocabulary to a multiple of 128 * TP. Import pads for the TP given (the
trainer loads it at another TP too: Megatron reads embedding tensors with allow_shape_mismatch); export
removes the padding.

The modules, which callers import from directly (this package re-exports nothing):
    common       what both directions share: the meta-device model and its shard table, the layout check, the
                 frame a conversion runs in (`converting`: one-process Megatron, output directory published
                 when complete, GC and progress), the reused buffer, `release_free_memory`, `DTYPES`, the summary
    to_megatron  import, `import_hf`: the materializer and the streaming save strategy
    to_hf        export, `export_hf`: the plan of the safetensors shards, the file-to-file copies
    stored       the tensors of a torch_dist checkpoint as stored: `stored_embedding`, `CheckpointReader`, and
                 the reading of a chunk's zip archive and pickle without `torch.load`
"""
