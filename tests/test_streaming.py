"""Streaming video input: `VideoStream` + `encode_video` give the processor + `get_video_features` features, and a
long-video answer through `streaming_chat_inputs` + chunked prefill equals the ordinary path."""

import threading

import pytest
import torch
from tiny_assets import write_test_video
from tiny_models import open_transfer_gates, tiny_model

from inference.tiny_default import build_tiny_default
import timeviper.video_processing_timeviper as video_processing
from timeviper.processing_timeviper import TimeViperVideoProcessor, VideoStream, streaming_chat_inputs


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return str(write_test_video(tmp_path_factory.mktemp("stream") / "clip.mp4", num_frames=60, fps=10, keyint=8))


def processor_pixels(video, **sampling):
    processor = TimeViperVideoProcessor(size={"height": 28, "width": 28})
    return processor, processor(video, **sampling)["pixel_values_videos"]


def test_stream_frames_are_the_processors_frames(video, monkeypatch):
    processor, expected = processor_pixels(video, fps=4.0)
    scans = []
    original_scan = video_processing._scan_frame_index
    monkeypatch.setattr(video_processing, "_scan_frame_index", lambda *args: scans.append(1) or original_scan(*args))
    stream = VideoStream(video, processor, chunk_frames=5, prefetch_chunks=1, fps=4.0)
    assert stream.num_frames == expected.shape[0] == 24
    chunks = list(stream)
    assert [c.dtype for c in chunks] == [torch.uint8] * 5 and [c.shape[0] for c in chunks] == [5, 5, 5, 5, 4]
    assert len(scans) == 1  # one demux pass over the file (it reads every packet), not one per chunk
    # The same resize to uint8 and the same float32 arithmetic: identical pixels.
    assert torch.equal(torch.cat(list(stream.pixel_chunks())), expected)


@pytest.mark.parametrize("chunk_frames", [4, 7])
def test_streamed_features_equal_get_video_features(video, chunk_frames):
    model = tiny_model(seed=2)
    model.config.vision_chunk_size = 4
    processor, pixels = processor_pixels(video, num_frames=13)
    with torch.no_grad():
        expected = model.get_video_features(pixels)
    stream = VideoStream(video, processor, chunk_frames=chunk_frames, num_frames=13)
    features = model.encode_video(stream.pixel_chunks(), num_frames=stream.num_frames, features_device="cpu")
    if chunk_frames == 4:  # the vision tower sees the same batches of frames
        assert torch.equal(features, expected)
    else:  # other batches: CPU matmul blocking may round differently in the last bits
        torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)


def test_stream_stops_its_thread_when_the_consumer_stops_and_refuses_bad_input(video):
    processor = TimeViperVideoProcessor(size={"height": 28, "width": 28})
    stream = VideoStream(video, processor, chunk_frames=2, prefetch_chunks=1, fps=10.0)
    iterator = iter(stream)
    next(iterator)
    next(iterator)  # the producer is now blocked on its full queue
    iterator.close()  # ... and must end instead of waiting forever
    assert not any(t.name == "timeviper-video-decode" for t in threading.enumerate())
    with pytest.raises(TypeError, match="path or bytes"):
        VideoStream(open(video, "rb"), processor)
    with pytest.raises(TypeError, match="Unexpected sampling"):
        VideoStream(video, processor, fsp=1.0)


@pytest.mark.parametrize("schedule", ["uni_1_0.5-attn_2_0.25", None])
def test_streamed_answer_equals_the_processor_path(video, schedule):
    """File -> streamed frames -> features -> chunked prefill -> greedy answer, against the processor's pixels and
    an unchunked prefill, for a left-padded batch of two questions about the video."""
    model, processor = build_tiny_default(token_compression=schedule)
    open_transfer_gates(model, 0.8)
    conversations = [
        [{"role": "user", "content": [{"type": "video", "path": video}, {"type": "text", "text": "what happens?"}]}],
        [{"role": "user", "content": [{"type": "video", "path": video, "num_frames": 5},
                                      {"type": "text", "text": "a"}]}],
    ]
    options = {"fps": 2.0, "padding": True, "padding_side": "left"}
    expected_inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt", processor_kwargs=options)
    inputs, streams = streaming_chat_inputs(processor, conversations, chunk_frames=3, **options)
    assert [s.num_frames for s in streams] == [12, 5]
    assert torch.equal(inputs["input_ids"], expected_inputs["input_ids"])
    assert torch.equal(inputs["attention_mask"], expected_inputs["attention_mask"])
    features = torch.cat([model.encode_video(s.pixel_chunks(), num_frames=s.num_frames) for s in streams])
    greedy = {"max_new_tokens": 5, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}
    streamed = model.generate(**inputs, video_features=features, prefill_chunk_size=7, **greedy)
    expected = model.generate(input_ids=expected_inputs["input_ids"], attention_mask=expected_inputs["attention_mask"],
                              pixel_values_videos=expected_inputs["pixel_values_videos"], **greedy)
    assert torch.equal(streamed.sequences, expected.sequences)
    # fp32: vision batches and prefill chunks only reorder sums (~1e-6 here); a wrong frame or token moves far more.
    torch.testing.assert_close(torch.stack(streamed.logits), torch.stack(expected.logits), atol=1e-4, rtol=0)


def test_features_streamed_into_the_prefill_equal_encoded_features(video):
    """streamed_video_features: frames encoded while the chunked prefill reaches them give the same answer."""
    model, processor = build_tiny_default(token_compression="uni_1_0.5-attn_2_0.25")
    model.config.vision_chunk_size = 3
    conversations = [
        [{"role": "user", "content": [{"type": "video", "path": video}, {"type": "text", "text": "what happens?"}]}],
        [{"role": "user", "content": [{"type": "video", "path": video, "num_frames": 5}, {"type": "text", "text": "a"}]}],
    ]
    options = {"fps": 2.0, "padding": True, "padding_side": "left"}
    greedy = {"max_new_tokens": 4, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}
    inputs, streams = streaming_chat_inputs(processor, conversations, chunk_frames=3, **options)
    features = torch.cat([model.encode_video(s.pixel_chunks(), num_frames=s.num_frames) for s in streams])
    expected = model.generate(**inputs, video_features=features, prefill_chunk_size=5, **greedy)
    streamed = model.streamed_video_features(streams)
    out = model.generate(**inputs, video_features=streamed, prefill_chunk_size=5, **greedy)
    assert torch.equal(out.sequences, expected.sequences)
    # The vision tower sees the same 3-frame batches: the same features, so the same logits up to nothing.
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(expected.logits), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="consumed once"):
        model.generate(**inputs, video_features=streamed, prefill_chunk_size=5, **greedy)
