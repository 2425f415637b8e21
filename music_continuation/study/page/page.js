// The rating page: one trial per screen, a slider per stimulus, ratings POSTed as they are given.
"use strict";

const state = { session: null, index: 0, audios: [], playing: null, position: 0, saving: Promise.resolve() };
const $ = (id) => document.getElementById(id);

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({ credentials: "same-origin" }, options || {}));
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function rated(trial) {
  return trial.stimuli.every((s) => trial.ratings[s.id] !== undefined);
}

function firstOpenTrial() {
  const index = state.session.trials.findIndex((t) => !rated(t));
  return index < 0 ? state.session.trials.length - 1 : index;
}

async function load() {
  const params = new URLSearchParams(location.search);
  const rater = params.get("rater") || "";
  const query = new URLSearchParams({ rater });
  if (params.get("token")) query.set("token", params.get("token"));
  const session = await api(`/api/session?${query}`);
  $("title").textContent = session.title;
  document.title = session.title;
  if (!session.rater) return chooseRater(session.raters, params);
  state.session = session;
  if (session.done) return finish();
  showTrial(firstOpenTrial());
}

function chooseRater(raters, params) {
  const select = $("rater-select");
  select.innerHTML = "";
  for (const name of raters) select.add(new Option(name, name));
  $("choose").hidden = false;
  if (!raters.length) showError("No raters are registered: start the server with --raters NAME ...");
  $("start").onclick = () => {
    params.set("rater", select.value);
    location.search = params.toString();
  };
}

function stopAll() {
  for (const audio of state.audios) audio.pause();
  document.querySelectorAll("button.play").forEach((b) => b.classList.remove("playing"));
  state.playing = null;
}

function play(audio, button) {
  const from = state.playing ? state.playing.currentTime : state.position;
  stopAll();
  const loopFrom = Number($("loop-from").value), loopTo = Number($("loop-to").value);
  // Switching keeps the position, so the same moment is compared across endings (as MUSHRA tools do).
  audio.currentTime = $("loop-on").checked && (from < loopFrom || from >= loopTo) ? loopFrom : from;
  audio.play().catch((error) => showError(`cannot play: ${error.message}`));
  button.classList.add("playing");
  state.playing = audio;
}

function addAudio(url) {
  const audio = document.createElement("audio");
  audio.preload = "auto";
  audio.src = url;
  audio.addEventListener("timeupdate", () => {
    if (audio !== state.playing) return;
    state.position = audio.currentTime;
    $("position").textContent = `${audio.currentTime.toFixed(1)} s`;
    const loopFrom = Number($("loop-from").value), loopTo = Number($("loop-to").value);
    if ($("loop-on").checked && loopTo > loopFrom && audio.currentTime >= loopTo) audio.currentTime = loopFrom;
  });
  audio.addEventListener("ended", () => {
    if ($("loop-on").checked) { audio.currentTime = Number($("loop-from").value); audio.play(); return; }
    stopAll();
    state.position = 0;
  });
  audio.addEventListener("error", () => showError(`cannot load ${url}`));
  document.body.appendChild(audio);
  state.audios.push(audio);
  return audio;
}

function showTrial(index) {
  stopAll();
  for (const audio of state.audios) audio.remove();
  state.audios = [];
  state.index = index;
  state.position = 0;
  const trial = state.session.trials[index];
  const count = state.session.trials.length;
  const done = state.session.trials.filter(rated).length;
  $("progress").textContent = `Rater ${state.session.rater} · trial ${index + 1} of ${count} · ${done} of ${count} rated`;
  $("choose").hidden = true;
  $("finished").hidden = true;
  $("trial").hidden = false;
  $("seam-hint").textContent = `context starts at ${trial.context_start_seconds.toFixed(1)} s, ` +
    `the ending at ${trial.seam_seconds.toFixed(1)} s`;
  $("loop-from").value = Math.max(0, trial.seam_seconds - 1).toFixed(1);
  $("loop-to").value = trial.duration_seconds.toFixed(1);
  const reference = addAudio(trial.reference);
  $("play-ref").onclick = () => play(reference, $("play-ref"));
  const box = $("stimuli");
  box.innerHTML = "";
  for (const stimulus of trial.stimuli) box.appendChild(stimulusRow(trial, stimulus));
  $("previous").disabled = index === 0;
  $("next").textContent = index === count - 1 ? "Finish" : "Next trial";
}

function stimulusRow(trial, stimulus) {
  const row = document.createElement("div");
  const value = trial.ratings[stimulus.id];
  row.className = "row stimulus" + (value === undefined ? " unrated" : "");
  row.dataset.stimulus = stimulus.id;
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = stimulus.letter;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "play";
  button.textContent = "Play";
  const audio = addAudio(stimulus.url);
  button.onclick = () => play(audio, button);
  const slider = document.createElement("input");
  slider.type = "range";
  slider.min = 0; slider.max = 100; slider.step = 1;
  slider.value = value === undefined ? 0 : value;
  slider.setAttribute("aria-label", `rating of ${stimulus.letter}`);
  const shown = document.createElement("span");
  shown.className = "value";
  shown.textContent = value === undefined ? "–" : String(value);
  slider.addEventListener("input", () => {
    row.classList.remove("unrated");
    shown.textContent = slider.value;
  });
  // One save at a time, in the order given: the last value moved to is the last one stored.
  slider.addEventListener("change", () => {
    const value = Number(slider.value);
    state.saving = state.saving.then(() => save(trial, stimulus, value, row, shown));
  });
  row.append(label, button, slider, shown);
  return row;
}

async function save(trial, stimulus, value, row, shown) {
  $("status").textContent = "saving…";
  try {
    await api("/api/rate", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ rater: state.session.rater, trial: trial.id, stimulus: stimulus.id, value }) });
    trial.ratings[stimulus.id] = value;
    row.classList.remove("unrated");
    shown.textContent = String(value);
    $("status").textContent = `saved (${stimulus.letter} = ${value})`;
    showError("");
  } catch (error) {
    $("status").textContent = "";
    showError(`not saved: ${error.message}`);
  }
}

function next() {
  const trials = state.session.trials;
  if (!rated(trials[state.index])) {
    showError("Rate every letter of this trial first (move each slider at least once).");
    return;
  }
  showError("");
  if (state.index < trials.length - 1) return showTrial(state.index + 1);
  if (trials.every(rated)) return finish();
  showTrial(firstOpenTrial());
}

function finish() {
  stopAll();
  $("trial").hidden = true;
  $("finished").hidden = false;
  $("progress").textContent = `Rater ${state.session.rater} · all ${state.session.trials.length} trials rated`;
}

async function reveal() {
  const rater = state.session.rater;
  try {
    const key = await api(`/api/reveal?rater=${encodeURIComponent(rater)}`);
    const table = document.createElement("table");
    table.className = "key";
    table.innerHTML = "<tr><th>trial</th><th>letter</th><th>condition</th></tr>";
    for (const [trial, letters] of Object.entries(key)) {
      for (const [letter, condition] of Object.entries(letters)) {
        const row = table.insertRow();
        for (const text of [trial, letter, condition]) row.insertCell().textContent = text;
      }
    }
    $("key").replaceChildren(table);
  } catch (error) {
    showError(error.message);
  }
}

$("previous").onclick = () => { showError(""); showTrial(Math.max(0, state.index - 1)); };
$("next").onclick = next;
$("stop").onclick = () => { stopAll(); state.position = 0; };
$("reveal").onclick = reveal;
load().catch((error) => showError(error.message));
