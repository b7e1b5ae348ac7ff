// The talk page's audio, on the audio rendering thread (AudioWorklet): two processors.
//
// parley-capture: the microphone at the context's rate (48 kHz, 44.1 kHz...) -> 16 kHz PCM16,
//   posted to the page in 20 ms frames (320 samples, 640 bytes), ready to send as they are.
// parley-player:  the agent's 16 kHz PCM16 frames -> the context's rate, through a small jitter
//   buffer (playback starts once `targetMs` is queued, and again after running dry); a `flush`
//   message empties it at once (the server's stop_audio: a barge-in).
//
// Both convert rates with one band-limited resampler: a windowed-sinc low-pass (Blackman window,
// cut off at 90 % of the lower rate's Nyquist frequency) evaluated at the fractional position of
// each output sample, from a table of 256 phases. Going down, the kernel widens by the ratio, so it
// filters out what 16 kHz cannot carry before decimating instead of dropping samples (aliasing).

const PHASES = 256;
const ZERO_CROSSINGS = 8; // kernel half-width, in samples of the lower rate
const CUTOFF = 0.9; // of the lower rate's Nyquist frequency

class Resampler {
  constructor(inRate, outRate) {
    this.step = inRate / outRate; // input samples per output sample
    const widen = Math.max(1, this.step); // going down: a longer kernel, in input samples
    this.half = Math.ceil(ZERO_CROSSINGS * widen);
    const fc = (CUTOFF * 0.5) / widen; // cut-off in cycles per input sample
    const taps = 2 * this.half;
    this.table = new Float32Array((PHASES + 1) * taps);
    for (let phase = 0; phase <= PHASES; phase++) {
      const frac = phase / PHASES;
      let sum = 0;
      for (let t = 0; t < taps; t++) {
        const d = frac + this.half - 1 - t; // distance from the output position to input tap t
        const x = d / this.half; // -1..1 across the kernel
        const window = Math.abs(x) >= 1 ? 0 : 0.42 + 0.5 * Math.cos(Math.PI * x) + 0.08 * Math.cos(2 * Math.PI * x);
        const arg = 2 * fc * d;
        const sinc = arg === 0 ? 1 : Math.sin(Math.PI * arg) / (Math.PI * arg);
        const value = 2 * fc * sinc * window;
        this.table[phase * taps + t] = value;
        sum += value;
      }
      for (let t = 0; t < taps; t++) this.table[phase * taps + t] /= sum; // unity gain at DC
    }
    this.taps = taps;
    this.reset();
  }

  reset() {
    this.buf = new Float32Array(4096);
    this.len = this.half; // `half` samples of silence before the first: the kernel's history
    this.pos = this.half; // the next output's position, in input samples (of buf)
  }

  push(samples) {
    if (this.len + samples.length > this.buf.length) this.compact(samples.length);
    this.buf.set(samples, this.len);
    this.len += samples.length;
  }

  canProduce() {
    return Math.floor(this.pos) + this.half < this.len;
  }

  next() {
    const i = Math.floor(this.pos);
    const frac = this.pos - i;
    const phase = Math.round(frac * PHASES);
    const start = i - this.half + 1;
    const base = phase * this.taps;
    const buf = this.buf;
    const table = this.table;
    let y = 0;
    for (let t = 0; t < this.taps; t++) y += buf[start + t] * table[base + t];
    this.pos += this.step;
    return y;
  }

  compact(incoming) {
    const drop = Math.max(0, Math.floor(this.pos) - this.half);
    const kept = this.len - drop;
    if (kept + incoming > this.buf.length) {
      const grown = new Float32Array(2 * (kept + incoming));
      grown.set(this.buf.subarray(drop, this.len), 0);
      this.buf = grown;
    } else {
      this.buf.copyWithin(0, drop, this.len);
    }
    this.len = kept;
    this.pos -= drop;
  }
}

const FRAME_SAMPLES_16K = 320; // 20 ms at 16 kHz

class Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const rate = (options.processorOptions && options.processorOptions.targetRate) || 16000;
    this.frameSamples = (rate * 20) / 1000;
    this.resampler = new Resampler(sampleRate, rate);
    this.frame = new Int16Array(this.frameSamples);
    this.filled = 0;
    this.frames = 0;
    this.running = true;
    this.port.onmessage = (event) => {
      if (event.data && event.data.type === "close") this.running = false;
    };
  }

  process(inputs) {
    const input = inputs[0];
    if (input && input.length > 0) {
      this.resampler.push(input[0]); // mono: the node mixes the microphone down (channelCount 1)
      while (this.resampler.canProduce()) {
        const y = this.resampler.next();
        const clamped = y > 1 ? 1 : y < -1 ? -1 : y;
        this.frame[this.filled++] = clamped < 0 ? clamped * 0x8000 : clamped * 0x7fff;
        if (this.filled === this.frameSamples) {
          this.port.postMessage(this.frame.buffer, [this.frame.buffer]); // transferred: no copy
          this.frame = new Int16Array(this.frameSamples);
          this.filled = 0;
          this.frames++;
        }
      }
    }
    return this.running;
  }
}

class Player extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    this.inputRate = opts.inputRate || 16000;
    this.frameSamples = (this.inputRate * 20) / 1000;
    this.targetFrames = Math.max(1, Math.round((opts.targetMs || 80) / 20));
    this.maxFrames = Math.round((opts.maxMs || 30000) / 20); // beyond: the oldest go (a stalled tab)
    this.resampler = new Resampler(this.inputRate, sampleRate);
    this.queue = [];
    this.playing = false;
    this.stats = { played: 0, received: 0, flushes: 0, underruns: 0, dropped: 0 };
    this.sinceReport = 0;
    this.running = true;
    this.port.onmessage = (event) => this.onMessage(event.data);
  }

  onMessage(data) {
    if (data instanceof ArrayBuffer) {
      const pcm = new Int16Array(data);
      const samples = new Float32Array(pcm.length);
      for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 0x8000;
      this.queue.push(samples);
      this.stats.received++;
      while (this.queue.length > this.maxFrames) {
        this.queue.shift();
        this.stats.dropped++;
      }
      return;
    }
    if (!data) return;
    if (data.type === "flush") {
      // Everything queued goes now, and the resampler's history with it: nothing of the cancelled
      // reply plays after the stop, not even the kernel's tail.
      this.queue = [];
      this.resampler.reset();
      this.playing = false;
      this.stats.flushes++;
      this.report();
    } else if (data.type === "close") {
      this.running = false;
    }
  }

  report() {
    this.port.postMessage({ type: "stats", queued: this.queue.length, playing: this.playing, ...this.stats });
    this.sinceReport = 0;
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing && this.queue.length >= this.targetFrames) this.playing = true;
    let i = 0;
    if (this.playing) {
      for (; i < out.length; i++) {
        while (!this.resampler.canProduce()) {
          const next = this.queue.shift();
          if (next === undefined) break;
          this.resampler.push(next);
          this.stats.played++;
        }
        if (!this.resampler.canProduce()) {
          this.playing = false; // ran dry: wait for the target again (a gap, not a crackle)
          this.stats.underruns++;
          break;
        }
        out[i] = this.resampler.next();
      }
    }
    for (; i < out.length; i++) out[i] = 0;
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    if (++this.sinceReport >= 40) this.report(); // ~every 100 ms at 48 kHz
    return this.running;
  }
}

registerProcessor("parley-capture", Capture);
registerProcessor("parley-player", Player);
